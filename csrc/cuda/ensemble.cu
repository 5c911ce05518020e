// The CUDA build of the ensemble kernels (no torch headers).
#include "ensemble.cuh"
