"""wanrt.bench"""
