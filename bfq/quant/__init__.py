"""The torch-side quantization primitives: the balanced quantizer and its scale search
(`quantizer`), fake-quantized modules for QAT (`nn`), the time-feature cache (`timecache`) and bit
recipes with the paper's accounting (`recipe`)."""
