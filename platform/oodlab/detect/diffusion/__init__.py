"""Diffusion pieces for LMD (Liu et al., ICML 2023): noise schedules, masks, the strided
replacement inpainter, image distances, and (parallel) scoring of whole sets."""
