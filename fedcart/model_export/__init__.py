"""The model and how it ships: the numpy reference (``model``), the on-device history
features (``features``), the ONNX graphs (``graphs``) and their export (``export``), the
signed bundle a device verifies (``bundle``, ``keys``) and the onnxruntime runtime
(``runtime``). Only numpy, onnxruntime and pynacl at import: a device imports it."""
