"""netmoe client: what a training job imports (route counts, token dispatcher, plans, the
service client). The reference model that uses it lives in ``netmoe.app.reference``.

Modules import torch / grpc at their own import, so importing this package stays cheap.
"""
