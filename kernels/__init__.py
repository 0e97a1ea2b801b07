"""nano4d kernels: fused Triton ops, each with a pure-torch ``<op>_ref`` reference.

Public ops dispatch on the device of their inputs: CUDA tensors run the Triton kernel, CPU tensors
run the reference, unless ``NANO4D_FORCE_TRITON=1`` sends them through the Triton interpreter.
This package never imports ``nano4d``.
"""
from kernels._common import force_triton, use_triton  # noqa: F401
from kernels.deform_attn import deform_attn, deform_attn_ref  # noqa: F401
from kernels.sdf_render import render_sdf, render_sdf_ref, sdf_gradient_ref  # noqa: F401
from kernels.trilinear import trilinear, trilinear_ref  # noqa: F401
from kernels.patch_attn import patch_attention, patch_attention_ref  # noqa: F401
from kernels.splat import (project_gaussians, project_gaussians_ref, rasterize_gaussians,  # noqa: F401
                           rasterize_gaussians_ref)

__all__ = ["force_triton", "use_triton", "deform_attn", "deform_attn_ref",
           "render_sdf", "render_sdf_ref", "sdf_gradient_ref",
           "patch_attention", "patch_attention_ref", "trilinear", "trilinear_ref",
           "project_gaussians", "rasterize_gaussians", "project_gaussians_ref", "rasterize_gaussians_ref"]
