// fastsal._core: converts and checks arguments, releases the GIL and calls the engine. Normalising user
// input (dtypes, class forms, NaN checks) is the Python layer's job; this file only guards the buffers.
#include <dlfcn.h>
#include <glog/logging.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

// Boost.Python after pybind11: both define Python macros, and this order compiles cleanly.
#include <google/protobuf/text_format.h>

#include <boost/python.hpp>
#include <caffe/caffe.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "gemm.hpp"
#include "saliency_engine.hpp"
#include "saliency_net.hpp"
#ifdef FASTSAL_WITH_CUDA
#include "cuda_kernels.hpp"
#endif

namespace py = pybind11;

namespace {

// The caffe::Net inside a pycaffe caffe.Net: pycaffe registered it with Boost.Python, whose registry
// lives in the libboost_python shared by both modules. Call with the GIL held.
const caffe::Net<float>& pycaffe_net(py::handle net) {
  boost::python::object object{boost::python::handle<>(boost::python::borrowed(net.ptr()))};
  boost::python::extract<caffe::Net<float>&> as_net(object);
  if (!as_net.check())
    throw py::type_error("net must be a caffe.Net, got " +
                         std::string(py::str(py::type::of(net).attr("__name__"))));
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

template <typename T>
T* optional_buffer(const py::object& array, const char* name, const std::vector<py::ssize_t>& expected) {
  return array.is_none() ? nullptr : checked_buffer<T>(array.cast<py::array>(), name, expected);
}

std::vector<py::ssize_t> with_front(std::vector<py::ssize_t> front, const std::vector<int>& shape) {
  front.insert(front.end(), shape.begin(), shape.end());
  return front;
}

// One of a few names, as its enum value; the error names the argument and every choice.
template <typename Enum>
Enum choice(const char* argument, const std::string& name,
            std::initializer_list<std::pair<const char*, Enum>> values) {
  std::string names;
  for (const auto& [text, value] : values) {
    if (name == text) return value;
    names += (names.empty() ? "'" : ", '") + std::string(text) + "'";
  }
  throw py::value_error(std::string(argument) + " must be one of " + names + ", got '" + name + "'");
}

fastsal::Accumulate accumulate_mode(const std::string& name) {
  using fastsal::Accumulate;
  return choice<Accumulate>(
      "accumulate", name,
      {{"sum", Accumulate::kSum}, {"squares", Accumulate::kSquares}, {"variance", Accumulate::kVariance}});
}

fastsal::Reduce reduce_mode(const std::string& name) {
  using fastsal::Reduce;
  return choice<Reduce>("reduce", name,
                        {{"absmax", Reduce::kAbsMax}, {"sum", Reduce::kSum}, {"none", Reduce::kNone}});
}

fastsal::Objective objective_mode(const std::string& name) {
  using fastsal::Objective;
  return choice<Objective>(
      "objective", name,
      {{"class_score", Objective::kClassScore}, {"l2", Objective::kL2}, {"guide", Objective::kGuide}});
}

fastsal::ReLURule relu_rule(const std::string& name) {
  using fastsal::ReLURule;
  return choice<ReLURule>("relu_rule", name,
                          {{"gradient", ReLURule::kGradient},
                           {"guided", ReLURule::kGuided},
                           {"deconvnet", ReLURule::kDeconvnet}});
}

// LRP's per-layer rules, as _attribution.py resolves them: (layer, rule, epsilon, gamma, alpha, beta, low,
// high).
using RuleEntry =
    std::tuple<std::string, std::string, float, float, float, float, std::vector<float>, std::vector<float>>;

std::vector<std::pair<std::string, fastsal::layers::Rule>> layer_rules(
    const std::vector<RuleEntry>& entries) {
  using fastsal::layers::RuleKind;
  std::vector<std::pair<std::string, fastsal::layers::Rule>> rules;
  for (const auto& [name, kind, epsilon, gamma, alpha, beta, low, high] : entries) {
    fastsal::layers::Rule rule;
    rule.kind = choice<RuleKind>("rule", kind,
                                 {{"gradient", RuleKind::kGradient},
                                  {"pass", RuleKind::kPass},
                                  {"norm", RuleKind::kNorm},
                                  {"epsilon", RuleKind::kEpsilon},
                                  {"gamma", RuleKind::kGamma},
                                  {"alpha_beta", RuleKind::kAlphaBeta},
                                  {"zplus", RuleKind::kZPlus},
                                  {"zbox", RuleKind::kZBox},
                                  {"flat", RuleKind::kFlat},
                                  {"wsquare", RuleKind::kWSquare}});
    rule.epsilon = epsilon, rule.gamma = gamma, rule.alpha = alpha, rule.beta = beta;
    rule.low = low, rule.high = high;
    rules.emplace_back(name, rule);
  }
  return rules;
}

// Every buffer's shape follows from images (N * samples rows), out (N, K, ...) and the engine's shapes.
fastsal::SaliencyRequest make_request(const fastsal::SaliencyEngine& engine, const py::array& images,
                                      const py::object& classes, const py::array& out, int samples,
                                      const py::object& sample_weights, const std::string& accumulate,
                                      const py::object& multiplier, const std::string& reduce,
                                      const py::object& top_classes, const py::object& activations,
                                      const py::object& scores, std::int64_t first_index,
                                      const std::string& objective = "class_score",
                                      const py::object& guide = py::none(),
                                      const py::object& accumulator = py::none(), bool finish = true,
                                      const py::object& baselines = py::none()) {
  if (samples < 1) throw py::value_error("samples must be at least 1");
  const py::ssize_t rows = images.ndim() > 0 ? images.shape(0) : 0;
  const py::ssize_t n = rows / samples;
  const py::ssize_t k = out.ndim() > 1 ? out.shape(1) : 0;
  const auto& g = engine.gradient_shape();
  fastsal::SaliencyRequest request;
  request.images = checked_buffer<float>(images, "images", with_front({n * samples}, engine.image_shape()));
  request.num_images = static_cast<int>(n);
  request.samples = samples;
  request.sample_weights = optional_buffer<float>(sample_weights, "sample_weights", {samples});
  request.accumulate = accumulate_mode(accumulate);
  request.multiplier = optional_buffer<float>(multiplier, "multiplier", with_front({n}, g));
  request.baselines = optional_buffer<float>(baselines, "baselines", with_front({n}, engine.image_shape()));
  request.reduce = reduce_mode(reduce);
  request.first_index = first_index;
  request.classes_per_image = static_cast<int>(k);
  request.out = checked_buffer<float>(out, "out",
                                      request.reduce == fastsal::Reduce::kNone
                                          ? with_front({n, k}, g)
                                          : with_front({n, k}, std::vector<int>(g.begin() + 1, g.end())));
  request.classes = optional_buffer<int>(classes, "classes", {n, k});
  request.top_classes = optional_buffer<int>(top_classes, "top_classes", {n, k});
  if (!request.classes && !request.top_classes)
    throw py::value_error("give classes, or top_classes to receive each image's top-k classes");
  request.activations = optional_buffer<float>(activations, "activations", with_front({n}, g));
  request.scores = optional_buffer<float>(scores, "scores", {n, engine.num_classes()});
  request.objective = objective_mode(objective);
  request.accumulator = optional_buffer<float>(
      accumulator, "accumulator",
      with_front({request.accumulate == fastsal::Accumulate::kVariance ? 2 : 1, n, k}, g));
  request.finish = finish;
  if (!guide.is_none()) {
    const py::array features = guide.cast<py::array>();
    if (features.ndim() != 2) throw py::value_error("guide should be a (C, M) array of features");
    request.guide = checked_buffer<float>(features, "guide", {features.shape(0), features.shape(1)});
    request.guide_columns = static_cast<int>(features.shape(1));
  }
  return request;
}

fastsal::BatchLayout batch_layout(const std::string& name) {
  using fastsal::BatchLayout;
  return choice<BatchLayout>(
      "batch_layout", name,
      {{"auto", BatchLayout::kAuto}, {"per_class", BatchLayout::kPerClass}, {"pairs", BatchLayout::kPairs}});
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
                       const std::string& gradient_blob, int batch_size, bool fast_layers, bool exact,
                       bool bf16_backward, bool bf16_forward, bool blocked_layouts, const std::string& rule,
                       int device, const std::string& layout, std::size_t memory_budget,
                       const std::vector<int>& image_shape, int threads, bool forward_only,
                       const std::vector<RuleEntry>& rules, bool deeplift) {
             fastsal::EngineOptions options;
             options.input_blob = input_blob;
             options.score_blob = score_blob;
             options.gradient_blob = gradient_blob;
             options.batch_size = batch_size;
             options.fast_layers = fast_layers;
             options.exact = exact;
             options.bf16_backward = bf16_backward;
             options.bf16_forward = bf16_forward;
             options.blocked_layouts = blocked_layouts;
             options.relu_rule = relu_rule(rule);
             options.device = device;
             options.layout = batch_layout(layout);
             options.memory_budget = memory_budget;
             options.image_shape = image_shape;
             options.threads = threads;
             options.forward_only = forward_only;
             options.layer_rules = layer_rules(rules);
             options.deeplift = deeplift;
             // The user's net is read under the GIL: another thread could be running pycaffe on it.
             return std::make_unique<fastsal::SaliencyEngine>(pycaffe_net(net), options);
           }),
           py::arg("net"), py::kw_only(), py::arg("input_blob"), py::arg("score_blob"),
           py::arg("gradient_blob") = "", py::arg("batch_size"), py::arg("fast_layers"),
           py::arg("exact") = true, py::arg("bf16_backward") = true, py::arg("bf16_forward") = false,
           py::arg("blocked_layouts") = true, py::arg("relu_rule") = "gradient", py::arg("device"),
           py::arg("layout"), py::arg("memory_budget"), py::arg("image_shape") = std::vector<int>{},
           py::arg("threads") = 0, py::arg("forward_only") = false,
           py::arg("layer_rules") = std::vector<RuleEntry>{}, py::arg("deeplift") = false)
      .def_property_readonly("input_blob", &fastsal::SaliencyEngine::input_blob)
      .def_property_readonly("score_blob", &fastsal::SaliencyEngine::score_blob)
      .def_property_readonly("gradient_blob", &fastsal::SaliencyEngine::gradient_blob)
      .def_property_readonly("image_shape", &fastsal::SaliencyEngine::image_shape)
      .def_property_readonly("gradient_shape", &fastsal::SaliencyEngine::gradient_shape)
      .def_property_readonly("score_shape", &fastsal::SaliencyEngine::score_shape)
      .def_property_readonly("num_classes", &fastsal::SaliencyEngine::num_classes)
      .def_property_readonly("bytes_per_image", &fastsal::SaliencyEngine::bytes_per_image)
      .def_property_readonly("threads", &fastsal::SaliencyEngine::threads)
      .def_property_readonly("score_rewrites", &fastsal::SaliencyEngine::score_rewrites)
      .def(
          "matches",
          [](const fastsal::SaliencyEngine& engine, py::handle net) {
            return engine.matches(pycaffe_net(net));
          },
          "Whether the engine still describes net: same image shape, same weight memory.", py::arg("net"))
      .def("reload_weights", &fastsal::SaliencyEngine::reload_weights,
           "After the net's weights were written in place: rebuild what the engine computed from them.",
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("batch_size", &fastsal::SaliencyEngine::batch_size)
      .def_property_readonly("head_layer", &fastsal::SaliencyEngine::head_layer)
      .def_property_readonly("blocked_blobs", &fastsal::SaliencyEngine::blocked_blobs)
      .def_property_readonly("fused_relus", &fastsal::SaliencyEngine::fused_relus)
      .def_property_readonly("device", &fastsal::SaliencyEngine::device)
      .def(
          "compute",
          [](fastsal::SaliencyEngine& engine, const py::array& images, const py::object& classes,
             const py::array& out, int samples, const py::object& sample_weights,
             const std::string& accumulate, const py::object& multiplier, const std::string& reduce,
             const py::object& top_classes, const py::object& activations, const py::object& scores,
             std::int64_t first_index, const std::string& objective, const py::object& guide,
             const py::object& accumulator, bool finish, const py::object& baselines) {
            const fastsal::SaliencyRequest request =
                make_request(engine, images, classes, out, samples, sample_weights, accumulate, multiplier,
                             reduce, top_classes, activations, scores, first_index, objective, guide,
                             accumulator, finish, baselines);
            // Safe without the GIL: the engine owns its net and the caller keeps these arrays alive.
            py::gil_scoped_release release;
            engine.compute(request);
          },
          py::arg("images"), py::arg("classes"), py::arg("out"), py::kw_only(), py::arg("samples") = 1,
          py::arg("sample_weights") = py::none(), py::arg("accumulate") = "sum",
          py::arg("multiplier") = py::none(), py::arg("reduce") = "absmax",
          py::arg("top_classes") = py::none(), py::arg("activations") = py::none(),
          py::arg("scores") = py::none(), py::arg("first_index") = 0, py::arg("objective") = "class_score",
          py::arg("guide") = py::none(), py::arg("accumulator") = py::none(), py::arg("finish") = true,
          py::arg("baselines") = py::none())
      .def(
          "scores",
          [](fastsal::SaliencyEngine& engine, const py::array& rows, const py::array& out,
             std::int64_t first_index, bool from_layer, const py::object& activations) {
            const py::ssize_t n = rows.ndim() > 0 ? rows.shape(0) : 0;
            fastsal::ForwardRequest request;
            request.num_rows = static_cast<int>(n);
            request.from_layer = from_layer;
            request.first_index = first_index;
            request.rows = checked_buffer<float>(
                rows, from_layer ? "values" : "images",
                with_front({n}, from_layer ? engine.gradient_shape() : engine.image_shape()));
            request.scores = checked_buffer<float>(out, "out", {n, engine.num_classes()});
            request.activations =
                optional_buffer<float>(activations, "activations", with_front({n}, engine.gradient_shape()));
            py::gil_scoped_release release;  // as in compute
            engine.forward_scores(request);
          },
          "The score blob's values (forward passes only) for images, or with from_layer for the layer "
          "blob's values (the layers below it do not run); activations: the layer blob's values.",
          py::arg("rows"), py::arg("out"), py::arg("first_index") = 0, py::kw_only(),
          py::arg("from_layer") = false, py::arg("activations") = py::none())
      .def(
          "profile_layers",
          [](fastsal::SaliencyEngine& engine, const py::array& images, const py::object& classes,
             const py::array& out) {
            const fastsal::SaliencyRequest request =
                make_request(engine, images, classes, out, 1, py::none(), "sum", py::none(), "absmax",
                             py::none(), py::none(), py::none(), 0);
            std::vector<fastsal::LayerTime> times;
            {
              py::gil_scoped_release release;
              times = engine.profile_layers(request);
            }
            py::list result;
            for (const auto& t : times)
              result.append(py::make_tuple(t.name, t.type, t.forward_seconds, t.backward_seconds));
            return result;
          },
          "(name, type, forward s, backward s) of every layer for compute()'s work.", py::arg("images"),
          py::arg("classes"), py::arg("out"));

  m.def(
      "plan_batches",
      [](const std::string& layout, bool on_gpu, int num_images, int classes_per_image, int batch_size) {
        const fastsal::BatchPlan plan =
            fastsal::plan_batches(batch_layout(layout), on_gpu, num_images, classes_per_image, batch_size);
        return py::make_tuple(plan.pairs ? "pairs" : "per_class", plan.rows_per_pass);
      },
      "(layout, batch rows per forward pass) the engine picks: its batch-layout rule, exposed for the tests.",
      py::arg("layout"), py::arg("on_gpu"), py::arg("num_images"), py::arg("classes_per_image"),
      py::arg("batch_size"));
  m.def("balanced_rows", &fastsal::balanced_rows,
        "Rows per pass for `units` rows at most `cap` a pass: as few passes as that allows, each as short "
        "as it can be. The engine's rule, which the package's own batching follows.",
        py::arg("units"), py::arg("cap"));

  m.def("cuda_current_device", [] {
#ifdef FASTSAL_WITH_CUDA
    int device = -1;
    fastsal::check_cuda_call(cudaGetDevice(&device), "reading the current CUDA device");
    return device;
#else
    return -1;
#endif
  });

  m.def("cuda_device_count", [] {
#ifdef FASTSAL_WITH_CUDA
    return fastsal::cuda_device_count();
#else
    return 0;
#endif
  });

  m.def(
      "default_score_blob", [](py::handle net) { return fastsal::default_score_blob(pycaffe_net(net)); },
      "The score blob fastsal differentiates when score= is not given.", py::arg("net"));

  m.def(
      "net_prototxt",
      [](py::handle net) {
        caffe::NetParameter param;
        pycaffe_net(net).ToProto(&param, false);
        // The definition only: the weights are copied blob by blob, not through text.
        for (int i = 0; i < param.layer_size(); ++i) param.mutable_layer(i)->clear_blobs();
        std::string text;
        if (!google::protobuf::TextFormat::PrintToString(param, &text))
          throw std::runtime_error("could not write the net's definition as prototxt text");
        return text;
      },
      "The net's definition as prototxt text (Net::ToProto without its weights), to build a copy; "
      "pycaffe keeps no prototxt.",
      py::arg("net"));

  m.def(
      "check_blob",
      [](py::handle net, const std::string& name, const std::string& role) {
        fastsal::find_blob(pycaffe_net(net), name, role);
      },
      "Raises ValueError for a name that is not a blob of net, naming the blobs most like it.",
      py::arg("net"), py::arg("name"), py::arg("role"));

  m.def(
      "caffe_mode", [] { return caffe::Caffe::mode() == caffe::Caffe::GPU ? "GPU" : "CPU"; },
      "Caffe's mode on the calling thread (pycaffe can set it but not read it).");

  m.def(
      "set_log_level", [](int level) { FLAGS_minloglevel = level; }, py::arg("level"),
      "glog's minimum level for Caffe's messages: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.");
  m.def(
      "log_level", [] { return int(FLAGS_minloglevel); }, "glog's minimum level now (see set_log_level).");

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
    // What this CPU gets (not fixed at build time): the numbers in bench/README.md name these.
    const char* core = fastsal::blas_core();
    info["openblas_core"] = core ? py::object(py::str(core)) : py::object(py::none());
    info["onednn_isa"] = fastsal::onednn_isa();
    info["inexact_backward"] = fastsal::inexact_backward_in_bf16() ? "bf16" : "fp32";
    info["perturbation_forward"] = fastsal::perturbation_forward_in_bf16() ? "bf16" : "fp32";
    return info;
  });
}
