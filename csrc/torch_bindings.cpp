// The vllm_ampere._C module: importing it runs the static TORCH_LIBRARY registrations of every
// op under csrc/ (torch.ops.vllm_ampere.*). It has no Python functions of its own, so a bare
// module init keeps pybind11 and torch/extension.h out of the build.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vllm_ampere CUDA ops", -1, nullptr};
  return PyModule_Create(&module);
}
