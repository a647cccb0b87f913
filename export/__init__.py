"""Export the bundle's checkpoints to ONNX and TensorRT plans and install them into Triton's model repository.

    python -m export --bundle path/to/wholeBody_ct_segmentation

Modules:
    onnx_export     the network -> ONNX (opset and exporter choice documented there), onnxruntime runner
    tensorrt_build  ONNX or Torch-TensorRT -> serialized TensorRT engine, engine runner; TensorRT is
                    imported lazily, so everything else works without it
    validate        validation windows (random and cut from a real CT), logit / label / Dice comparison
                    against PyTorch fp32 and the thresholds a candidate must meet
    triton_config   config.pbtxt from Triton's ModelConfig message, atomic installation of a model
    __main__        the command line
"""
