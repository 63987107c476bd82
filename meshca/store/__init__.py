"""The shared store of meshca replicas (issue 13): etcd holds the mesh config, the CA state and the proxy registry."""
