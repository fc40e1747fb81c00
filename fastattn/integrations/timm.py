"""timm: CbamModule, LightCbamModule (timm.layers.cbam) and NonLocalAttn (timm.layers.non_local_attn)."""
from __future__ import annotations

from timm.layers import cbam as timm_cbam
from timm.layers import non_local_attn as timm_nl

from fastattn import nn as fnn
from fastattn.convert import Rule, attention_rule, cbam_rule, nonlocal_attn_problem


def rules() -> list[Rule]:
    return [cbam_rule(timm_cbam.LightCbamModule, "timm_light"), cbam_rule(timm_cbam.CbamModule, "timm"),
            attention_rule(timm_nl.NonLocalAttn, fnn.NonLocalAttn, nonlocal_attn_problem),
            Rule(timm_nl.BatNonLocalAttn, lambda m: "bilinear attentional transform: no softmax attention to fuse",
                 None)]
