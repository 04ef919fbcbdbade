"""Offline model tools: fetch a checkpoint from the hub, export the ONNX towers."""
