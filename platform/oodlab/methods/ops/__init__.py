"""Building blocks one method uses: augmentations (CCL), pruning masks (UMAP)."""
