"""fedsim run on Flower's supported simulation path: a private ``flower-superlink --simulation`` and ``flwr run``."""
