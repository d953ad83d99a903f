"""GistNet: the compressor that turns 32 vectors into one gist, level after level, and its gist
lane (the adapters with which the base model reads gists).

    net.py     GistNet, its config, the mean-pool and constant baselines, the Compressor type
    lane.py    GistLane: low-rank adapters that fire only at gist rows
    export.py  save / load / digest of an export (GistNet and lane together), with_levels
"""

from megacontext.exports import check_training_record  # re-exported: its old home
from megacontext.gistnet.export import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    gistnet_digest,
    load_gistnet,
    save_gistnet,
    with_levels,
)
from megacontext.gistnet.lane import LANE_SETTINGS, GistLane, LaneConfig, LaneRows, lane_of
from megacontext.gistnet.net import (
    Compressor,
    ConstantGist,
    GistNet,
    GistNetConfig,
    MeanPoolGist,
    flops_per_child,
    untrained_levels,
)

__all__ = ["FORMAT_VERSION", "LANE_SETTINGS", "META_FILE", "WEIGHTS_FILE", "Compressor",
           "ConstantGist", "GistLane", "GistNet", "GistNetConfig", "LaneConfig", "LaneRows",
           "MeanPoolGist", "check_training_record", "flops_per_child", "gistnet_digest",
           "lane_of", "load_gistnet", "save_gistnet", "untrained_levels", "with_levels"]
