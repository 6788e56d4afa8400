"""Helpers below every room of keras_glam (atomic files, hashing); they import none of it."""
