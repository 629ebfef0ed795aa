"""What a shopping app does with the FedCart device library: install the signed model it
ships with, recommend offline, keep a purchase on the device, take part in a round.

    python examples/device_app.py STATE_DIR SERVER_KEY BUNDLE URL CART [TOKEN]
"""

import asyncio
import sys

from fedcart.edge_client import Device, read_bundle, read_public_key

state_dir, key, bundle_path, url, cart, *token = sys.argv[1:]
server_key = read_public_key(key)  # pinned: every model and round must be signed by it
device = Device(state_dir, server_key)  # identity, baskets, model: kept in state_dir
if device.model_version < 0:  # first run: verify and install the bundle the app ships
    device.install_members(read_bundle(bundle_path, server_key).members(), bundle_path)
for rec in device.recommend(cart.split(","), k=5):  # offline, on the device's own data
    print(f"recommend {rec.item} {rec.score:.3f} {rec.name}")
device.add_basket(cart.split(","))  # the purchase, stored on the device only
session = device.participate(url, rounds=1, token=token[0] if token else None)
for report in asyncio.run(session):  # in a background job: charging, unmetered, idle
    print(f"round {report.round_id}: {report.status}, model v{device.model_version}")
