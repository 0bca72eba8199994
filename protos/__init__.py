"""The netmoe gRPC contract: ``netmoe/v1/placement.proto`` and the code generated from it.

Import as ``from netmoe.protos import placement_pb2 as pb, placement_pb2_grpc``. The generated
modules are committed; ``python -m netmoe.protos.generate`` rewrites them (needs grpcio-tools).
"""
