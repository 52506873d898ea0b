"""The public ops. Each picks its Triton kernel or its PyTorch reference (`ops.backend`)."""

from emu2_engine.ops.attention import modality_attention, modality_mask
from emu2_engine.ops.group_norm import group_norm, group_norm_reference
from emu2_engine.ops.head_loss import HeadLoss, emu2_head_loss
from emu2_engine.ops.pool_project import pool_patches, pool_project
from emu2_engine.ops.spatiotemporal_conv import (spatiotemporal_conv, spatiotemporal_conv_conv3d,
                                                  spatiotemporal_conv_cudnn, spatiotemporal_conv_library,
                                                  spatiotemporal_conv_passes, spatiotemporal_conv_reference)

__all__ = ["modality_attention", "modality_mask", "group_norm", "group_norm_reference", "emu2_head_loss",
           "HeadLoss", "pool_patches", "pool_project", "spatiotemporal_conv", "spatiotemporal_conv_conv3d",
           "spatiotemporal_conv_cudnn",
           "spatiotemporal_conv_library", "spatiotemporal_conv_passes",
           "spatiotemporal_conv_reference"]
