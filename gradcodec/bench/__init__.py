"""`gradcodec bench`: compression ratio, distortion and speed of codecs on chosen workloads."""
