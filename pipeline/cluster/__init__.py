"""The Ray plumbing: starting or joining a cluster quietly, token auth, the private Ray calls fenced in one
module, what the cluster can hold, and the driver's metrics."""
