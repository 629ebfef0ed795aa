"""FedCart: private, on-device shopping-cart recommendation.

Subpackages, each one job: ``fedcart.secagg`` (SecAgg+ sans-I/O core), ``fedcart.protocol``
(the device-aggregator contract both sides import: frames, control messages, round terms,
the update and statistics encodings), ``fedcart.model_export`` (the model, its ONNX graphs
and the signed bundle), ``fedcart.edge_client`` (the device library), ``fedcart.aggregator``
(the service, and the item-item tables it derives), ``fedcart.data`` (data sets, the
evaluation protocol, central baselines) and ``fedcart.simulation`` (a deployment on real
data, and central training).
A device imports ``fedcart.edge_client`` only; the ``device`` extra installs what that needs.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedcart")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
