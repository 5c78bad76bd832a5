"""Training pieces in pure torch: the degradation pipeline, losses and one step per module.

The Ray Train loops, data reading and checkpoints around them live in the top-level ``trainer/``
package; file I/O goes through ``patchscaler.weights`` only.
"""
