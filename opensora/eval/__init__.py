"""Measurements of generated videos that need no model (used by the demo's report)."""

from opensora.eval.colour_motion import (
    BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, CheckConfig, CheckReport, ShapeCaption, VideoAnalysis,
    analyze_video, check_videos, parse_caption,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "DIRECTIONS", "SHAPES", "CheckConfig", "CheckReport", "ShapeCaption",
    "VideoAnalysis", "analyze_video", "check_videos", "parse_caption",
]
