package proc

// TreeFromChildren and TreeFromScan are Tree's two ways, for comparing them.
var (
	TreeFromChildren = treeFromChildren
	TreeFromScan     = treeFromScan
)

// ThreadsStopped is Stop's check that every thread of a process is stopped.
var ThreadsStopped = threadsStopped
