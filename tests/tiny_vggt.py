"""A tiny randomly-initialised VGGT for tests: the real vggt code path at a fraction of the size.

VGGT(embed_dim=...) alone keeps the ViT-L patch embed (1024 wide), so the parts are built here:
its Aggregator with small depth/width and a conv patch embed, and heads sized to match.
"""

from __future__ import annotations

import torch


def tiny_vggt(embed_dim: int = 32, depth: int = 2, num_heads: int = 2, seed: int = 0) -> torch.nn.Module:
    from vggt.heads.camera_head import CameraHead
    from vggt.heads.dpt_head import DPTHead
    from vggt.models.aggregator import Aggregator
    from vggt.models.vggt import VGGT

    torch.manual_seed(seed)
    net = VGGT.__new__(VGGT)
    torch.nn.Module.__init__(net)
    net.aggregator = Aggregator(img_size=518, patch_size=14, embed_dim=embed_dim, depth=depth,
                                num_heads=num_heads, patch_embed="conv")
    net.camera_head = CameraHead(dim_in=2 * embed_dim, trunk_depth=1, num_heads=num_heads)
    net.depth_head = DPTHead(dim_in=2 * embed_dim, output_dim=2, activation="exp", conf_activation="expp1",
                             features=16, out_channels=[8, 16, 32, 32],
                             intermediate_layer_idx=[0, 0, depth - 1, depth - 1])
    net.point_head = None
    net.track_head = None
    with torch.no_grad():
        # At random init the camera head's field-of-view outputs sit near 0 (relu), i.e. an
        # infinite focal length and no usable points: push them positive (fx ~ 200 px at 518).
        net.camera_head.pose_branch.fc2.bias[7:] += 0.6
    return net.eval()


def make(device: str = "cpu", **options):
    """Backend factory (--backend tiny_vggt:make): the real VGGT wrapper around a tiny network."""
    from streaming_vggt import make_vggt

    return make_vggt(device, network=tiny_vggt(), precision=options.get("precision", "auto"))
