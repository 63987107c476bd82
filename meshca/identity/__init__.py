"""Who a workload is: SPIFFE IDs and JWT verification with the node binding rule."""
