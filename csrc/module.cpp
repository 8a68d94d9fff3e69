// The Python module vse_kernels._C: importing it runs the TORCH_LIBRARY registrations of every op in
// csrc/, and it carries what the build contained (read by vse_kernels.info).
#include <Python.h>
#include <torch/version.h>

#define VSE_STR_(x) #x
#define VSE_STR(x) VSE_STR_(x)

static struct PyModuleDef vse_module = {PyModuleDef_HEAD_INIT, "_C", "vse_kernels compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&vse_module);
  if (m == nullptr) return nullptr;
#ifdef VSE_WITH_CUDA
  PyModule_AddObject(m, "with_cuda", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "with_cuda", Py_NewRef(Py_False));
#endif
  PyModule_AddStringConstant(m, "torch_version",
                             VSE_STR(TORCH_VERSION_MAJOR) "." VSE_STR(TORCH_VERSION_MINOR) "." VSE_STR(TORCH_VERSION_PATCH));
  return m;
}
