"""Ready-made graph factories (``MODULE:FUNCTION``) for `swarmshard plan`, `serve --graph` and `demo --graph`."""
