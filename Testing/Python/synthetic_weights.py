"""Checkpoints laid out as each model's published weights file is (containers, prefixes and the parts of
the upstream network we do not run), holding the tensors a test chooses: the upstream formats, offline."""

from __future__ import annotations

from pathlib import Path

import torch


def upstream_checkpoint(name: str, state: dict, folder: Path) -> Path:
    """``state`` laid out as the model's published weights file is, with the parts we do not run."""
    other = torch.zeros(3)
    if name == "FMCIB":
        payload, file = {"trunk_state_dict": state, "head_state_dict": {}}, "model_weights.torch"
    elif name == "CTFM":
        from safetensors.torch import save_file

        tensors = {f"encoder.{k}": v.contiguous() for k, v in state.items()}
        tensors["up_layers.0.upsample.deconv.weight"] = other
        save_file(tensors, str(folder / "model.safetensors"))
        return folder / "model.safetensors"
    elif name == "VISTA3D":
        payload = {f"image_encoder.encoder.{k}": v for k, v in state.items()}
        payload |= {"image_encoder.up_layers.0.weight": other, "class_head.mlp.0.weight": other}
        file = "model_vista3d.pt"
    elif name == "SUPREME":
        inner = {f"module.backbone.{k}": v for k, v in state.items()}
        inner |= {"module.backbone.up_tr256.up_conv.weight": other, "module.organ_embedding": other}
        payload, file = {"net": inner, "epoch": 2100}, "supervised_suprem_unet_2100.pth"
    elif name == "ModelsGen":
        inner = {f"module.{k}": v for k, v in state.items()}
        inner |= {"module.up_tr64.up_conv.weight": other, "module.out_tr.final_conv.weight": other}
        payload, file = {"state_dict": inner}, "Genesis_Chest_CT.pt"
    else:
        payload = {"state_dict": {f"swinViT.{k}": v for k, v in state.items()} | {"encoder1.layer.conv1.weight": other}}
        file = "VoCo_H_SSL_head.pt"
    torch.save(payload, folder / file)
    return folder / file
