"""wanrt.quant"""
