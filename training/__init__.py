"""Training pipeline: data loading and caching, the supervised recipe, few-shot evaluation, export."""
