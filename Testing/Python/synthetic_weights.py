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
    elif name == "PASTA":
        payload = {f"module.{k}": v for k, v in state.items()}
        payload |= {"module.tu.0.weight": other, "module.conv_blocks_localization.0.0.blocks.0.conv.weight": other}
        payload |= {"module.seg_outputs.0.weight": other, "module.head.0.weight": other}
        file = "PASTA final.pth"
    elif name == "Merlin":
        payload = {f"encode_image.{k}": v for k, v in state.items()}
        payload |= {"encode_image.i3_resnet.classifier.weight": torch.zeros(1692, 2048, 1, 1, 1)}
        payload |= {"encode_image.i3_resnet.classifier.bias": torch.zeros(1692), "logit_scale": torch.ones(())}
        payload |= {"encode_text.linear_layer.weight": torch.zeros(512, 768), "encode_text.linear_layer.bias": other}
        file = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
    elif name == "CTClipVit":
        payload = {f"visual_transformer.{k}": v for k, v in state.items()}
        unused = (
            "to_patch_emb_first_frame.2.weight",
            "dec_spatial_transformer.layers.0.1.to_q.weight",
            "dec_temporal_transformer.norm_out.gamma",
            "to_pixels.0.weight",
            "to_pixels_first_frame.0.weight",
            "vq._codebook.initted",
            "vq._codebook.cluster_size",
            "vq._codebook.embed_avg",
        )
        payload |= {f"visual_transformer.{k}": other for k in unused}
        payload |= {"text_transformer.embeddings.word_embeddings.weight": other, "to_visual_latent.weight": other}
        payload |= {"temperature": torch.ones(())}
        file = "CT-CLIP_v2.pt"
    else:
        payload = {"state_dict": {f"swinViT.{k}": v for k, v in state.items()} | {"encoder1.layer.conv1.weight": other}}
        file = "VoCo_H_SSL_head.pt"
    torch.save(payload, folder / file)
    return folder / file
