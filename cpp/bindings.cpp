// fastsal._core: converts and checks arguments, releases the GIL and calls the engine. Normalising user
// input (dtypes, class forms, NaN checks) is the Python layer's job; this file only guards the buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
// Boost.Python after pybind11: both define Python macros, and this order compiles cleanly.
#include <boost/python.hpp>
#include <caffe/caffe.hpp>
#include <dlfcn.h>
#include <glog/logging.h>

#include <sstream>
#include <string>
#include <vector>

#include "saliency_engine.hpp"

namespace py = pybind11;

namespace {

// The caffe::Net inside a pycaffe caffe.Net: pycaffe registered it with Boost.Python, whose registry
// lives in the libboost_python shared by both modules. Call with the GIL held.
const caffe::Net<float>& pycaffe_net(py::handle net) {
  boost::python::object object{boost::python::handle<>(boost::python::borrowed(net.ptr()))};
  boost::python::extract<caffe::Net<float>&> as_net(object);
  if (!as_net.check())
    throw py::type_error("net must be a caffe.Net, got " + std::string(py::str(py::type::of(net).attr("__name__"))));
  return as_net();
}

std::string shape_string(const std::vector<py::ssize_t>& shape) {
  std::ostringstream out;
  out << "(";
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

template <typename T>
T* checked_buffer(const py::array& array, const char* name, const std::vector<py::ssize_t>& expected) {
  std::vector<py::ssize_t> shape(array.shape(), array.shape() + array.ndim());
  if (shape != expected)
    throw py::value_error(std::string(name) + ".shape should be " + shape_string(expected) + ", got " +
                          shape_string(shape));
  if (!py::isinstance<py::array_t<T>>(array) || !(array.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " should be a C-contiguous array of " +
                          std::string(py::str(py::dtype::of<T>())));
  return static_cast<T*>(const_cast<void*>(array.data()));
}

std::string libcaffe_path() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&caffe::Caffe::Get), &info) || !info.dli_fname) return "";
  return info.dli_fname;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastsal's C++ engine; use the fastsal package, not this module.";

  py::class_<fastsal::SaliencyEngine>(m, "Engine")
      .def(py::init([](py::handle net, const std::string& input_blob, const std::string& score_blob,
                       int batch_size, std::size_t memory_budget) {
             // The user's net is read under the GIL: another thread could be running pycaffe on it.
             return std::make_unique<fastsal::SaliencyEngine>(
                 pycaffe_net(net), fastsal::EngineOptions{input_blob, score_blob, batch_size, memory_budget});
           }),
           py::arg("net"), py::kw_only(), py::arg("input_blob"), py::arg("score_blob"), py::arg("batch_size"),
           py::arg("memory_budget"))
      .def_property_readonly("input_blob", &fastsal::SaliencyEngine::input_blob)
      .def_property_readonly("score_blob", &fastsal::SaliencyEngine::score_blob)
      .def_property_readonly("image_shape", &fastsal::SaliencyEngine::image_shape)
      .def_property_readonly("num_classes", &fastsal::SaliencyEngine::num_classes)
      .def_property_readonly("batch_size", &fastsal::SaliencyEngine::batch_size)
      .def_property_readonly("num_layers", &fastsal::SaliencyEngine::num_layers)
      .def(
          "compute",
          [](fastsal::SaliencyEngine& engine, const py::array& images, const py::object& classes,
             const py::array& maps, const py::object& gradients, const py::object& top_classes) {
            const auto& image_shape = engine.image_shape();
            const py::ssize_t n = images.ndim() > 0 ? images.shape(0) : 0;
            const py::ssize_t k = maps.ndim() > 1 ? maps.shape(1) : 0;
            std::vector<py::ssize_t> images_shape = {n}, grad_shape = {n, k}, map_shape = {n, k};
            images_shape.insert(images_shape.end(), image_shape.begin(), image_shape.end());
            grad_shape.insert(grad_shape.end(), image_shape.begin(), image_shape.end());
            map_shape.insert(map_shape.end(), image_shape.begin() + 1, image_shape.end());

            fastsal::SaliencyRequest request;
            request.images = checked_buffer<float>(images, "images", images_shape);
            request.num_images = static_cast<int>(n);
            request.classes_per_image = static_cast<int>(k);
            request.maps = checked_buffer<float>(maps, "maps", map_shape);
            if (!classes.is_none())
              request.classes = checked_buffer<int>(classes.cast<py::array>(), "classes", {n, k});
            else if (!top_classes.is_none())
              request.top_classes = checked_buffer<int>(top_classes.cast<py::array>(), "top_classes", {n, k});
            else
              throw py::value_error("give classes, or top_classes to receive each image's top-k classes");
            if (!gradients.is_none())
              request.gradients = checked_buffer<float>(gradients.cast<py::array>(), "gradients", grad_shape);
            // Safe without the GIL: the engine owns its net and the caller keeps these arrays alive.
            py::gil_scoped_release release;
            engine.compute(request);
          },
          py::arg("images"), py::arg("classes"), py::arg("maps"), py::arg("gradients") = py::none(),
          py::arg("top_classes") = py::none());

  m.def(
      "set_log_level", [](int level) { FLAGS_minloglevel = level; }, py::arg("level"),
      "glog's minimum level for Caffe's messages: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.");

  m.def("build_info", [] {
    py::dict info;
    info["caffe_version"] = FASTSAL_CAFFE_VERSION;
    info["blas"] = FASTSAL_CAFFE_BLAS;
#ifdef CPU_ONLY
    info["cuda"] = false;
#else
    info["cuda"] = true;
#endif
#ifdef USE_CUDNN
    info["cudnn"] = true;
#else
    info["cudnn"] = false;
#endif
    info["libcaffe"] = libcaffe_path();
    return info;
  });
}
