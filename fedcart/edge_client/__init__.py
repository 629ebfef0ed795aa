"""The FedCart device library, what a shopping app embeds: a device's identity, purchase
history and signed model, offline recommendations, and rounds of federated training::

    import asyncio, ssl
    from fedcart.edge_client import Device, read_bundle, read_public_key

    server_key = read_public_key("agg/signing.pub")  # pinned: it signs models and rounds
    device = Device(state_dir, server_key)           # everything is kept in state_dir
    if device.model_version < 0:                     # first run: the model the app ships
        device.install_members(read_bundle(bundle_dir, server_key).members(), bundle_dir)
    top = device.recommend(cart, k=10)               # offline
    device.add_basket(cart)                          # a purchase; it never leaves the device
    reports = asyncio.run(device.participate(        # charging, unmetered network, idle
        "wss://aggregator.example:8765/ws", ssl_context=ssl.create_default_context()))

``examples/device_app.py`` is this program whole, and the README's "The device library"
section says more. A ``Device`` holds no file or connection open between calls: there is
nothing to close. ``participate`` trains and uploads: an app runs it as a background job
that its platform's scheduler starts when the phone is charging, on an unmetered network and
idle (WorkManager constraints on Android, a ``BGProcessingTaskRequest`` on iOS).

Importing this package loads the device's dependencies only (numpy, onnxruntime,
websockets, PyNaCl), none of the aggregator's (onnx, pandas, scipy, dp_accounting): the
``device`` extra installs no more. The command line (``fedcart.edge_client.cli``, click) is
not imported.
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
