"""netmoe client: the training-side half (histograms, token dispatcher, plans, reference model).

Modules import torch / grpc lazily at their own import, so importing this package stays cheap.
"""
