"""swarmshard: decentralized sharded inference on heterogeneous, untrusted machines."""
__version__ = "0.1.0"
