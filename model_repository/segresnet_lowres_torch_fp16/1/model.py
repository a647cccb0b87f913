"""PyTorch network model; the implementation is shared by every segresnet_*_torch_* model."""

from wholebody.triton_python import TorchNetworkModel as TritonPythonModel  # noqa: F401
