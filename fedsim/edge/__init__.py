"""Edge demo: fedsim on Flower's deployment runtime (SuperLink, SuperNodes, ``flwr run``)."""
