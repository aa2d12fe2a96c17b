"""The segmentation networks: any MONAI network, described by a name and keyword arguments
so that a model file can rebuild it."""

from __future__ import annotations

from typing import Any

import numpy as np

from MultiModalAnalysisLib.errors import ConfigError

# A compact 3-D U-Net (MONAI ``UNet`` with residual units, about 0.6 M parameters) that
# trains on a CPU and runs a whole STS case in seconds; its dropout also allows MC-dropout.
DEFAULT_NETWORK: dict[str, Any] = {
    "name": "UNet",
    "kwargs": {
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 1,
        "norm": "instance",
        "dropout": 0.1,
    },
}


def size_multiple(spec: dict[str, Any]) -> int:
    """What every patch dimension must be a multiple of for the network of ``spec``: the
    product of its strides (U-Net, DynUNet) or ``2 ** (len(blocks_down) - 1)`` (SegResNet);
    1 where the spec does not say (or gives strides per axis)."""
    kwargs = spec.get("kwargs", {})
    if "strides" in kwargs:
        if any(isinstance(stride, list | tuple) for stride in kwargs["strides"]):
            return 1  # strides per axis: not checked here
        return max(int(np.prod([int(stride) for stride in kwargs["strides"]])), 1)
    if "blocks_down" in kwargs:
        return 2 ** (len(kwargs["blocks_down"]) - 1)
    if spec.get("name") == "SegResNet":
        return 8  # MONAI's default: four levels
    return 1


def build_network(spec: dict[str, Any], in_channels: int, out_channels: int):
    """A MONAI network from ``{"name": ..., "kwargs": {...}}`` for 3-D inputs.

    Args:
        spec: the class name in ``monai.networks.nets`` (``UNet``, ``DynUNet``,
            ``SegResNet``, ``BasicUNet``, ``AttentionUnet``, ...) and its keyword arguments
            other than the dimensions and channel counts.
        in_channels: one per input modality.
        out_channels: background + one per label.

    Raises:
        ConfigError: unknown network or arguments it does not take.
    """
    from monai.networks import nets

    name = spec.get("name")
    network_type = getattr(nets, str(name), None)
    if network_type is None:
        raise ConfigError(f"unknown MONAI network '{name}' (see monai.networks.nets).")
    kwargs = dict(spec.get("kwargs", {}))
    try:
        return network_type(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs
        )
    except TypeError as error:
        raise ConfigError(f"network {name} does not accept these settings: {error}") from None
