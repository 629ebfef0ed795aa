"""The FedCart device runtime, what an app embeds: a device's identity, purchase history
and signed model, offline recommendations, and rounds of federated training::

    from fedcart.edge_client import Device, read_public_key

    device = Device(state_dir, read_public_key(server_key_hex))  # holds no file open
    device.add_basket(["sku-1", "sku-2"])
    top = device.recommend(cart, k=10)
    reports = await device.participate("wss://aggregator.example:8765/ws",
                                       ssl_context=ssl.create_default_context())

Importing it loads the device's dependencies only (numpy, onnxruntime, websockets,
PyNaCl), none of the aggregator's (onnx, pandas, scipy, click, dp_accounting): the
``device`` extra installs no more. The command line (``edge_client.cli``) is not imported.
"""

from fedcart.edge_client.device import Device, RoundReport
from fedcart.edge_client.recommender import OfflineRecommender, Recommendation, UnknownItemError
from fedcart.model_export.bundle import Bundle, BundleError, read_bundle
from fedcart.model_export.keys import read_public_key
from fedcart.protocol.policy import DevicePolicy
from fedcart.secagg.policy import ClientPolicy

__all__ = [
    "Bundle",
    "BundleError",
    "ClientPolicy",
    "Device",
    "DevicePolicy",
    "OfflineRecommender",
    "Recommendation",
    "RoundReport",
    "UnknownItemError",
    "read_bundle",
    "read_public_key",
]
