"""wanrt.kernels"""
