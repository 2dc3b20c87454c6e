"""EAGLE-3 draft training: data, target capture, training-time test, trainer and CLI (`specforge`)."""
