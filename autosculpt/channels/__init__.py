"""Channel structure: groups of channels found from the fx graph, physical channel removal, magnitude
importance, and folding empty filters (pattern 0) into their consumers.

```python
from autosculpt.channels import channel_groups, remove_channels, group_importance, keep_most_important
groups = channel_groups(model, x)                      # [ChannelGroup], prunable or not (with reasons)
g = next(g for g in groups if g.prunable)
keep = keep_most_important(group_importance(model, g), g.channels // 2)
small = remove_channels(model, x, {g.id: keep})        # members physically smaller
folded = fold_empty_filters(model, x).model            # all-zero filters removed, constants folded
```
"""
from ._analysis import is_timm_attention
from .fold import FoldResult, empty_filters, fold_empty_filters
from .groups import ChannelAnalysis, ChannelGroup, ChannelMember, ChannelTraceError, analyze_channels, channel_groups
from .importance import channel_importance, group_importance, keep_most_important
from .shrink import ChannelShrinkError, PrunedMultiheadAttention, PrunedSelfAttention, remove_channels

__all__ = ["channel_groups", "analyze_channels", "ChannelGroup", "ChannelMember", "ChannelAnalysis",
           "ChannelTraceError", "remove_channels", "ChannelShrinkError", "PrunedMultiheadAttention",
           "PrunedSelfAttention", "group_importance", "channel_importance", "keep_most_important",
           "fold_empty_filters", "FoldResult", "empty_filters", "is_timm_attention"]
