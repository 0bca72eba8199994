"""The emulated multi-node cluster: network namespaces, shaped links, gloo ranks inside them."""
