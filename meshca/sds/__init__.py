"""Workload secrets over SDS: each identity's certificate, its rotation and its retention."""
