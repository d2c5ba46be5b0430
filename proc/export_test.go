package proc

// TreeFromChildren and TreeFromScan are Tree's two ways, for comparing them.
var (
	TreeFromChildren = treeFromChildren
	TreeFromScan     = treeFromScan
)
