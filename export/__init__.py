"""wanrt.export"""
