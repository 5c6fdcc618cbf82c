// animate: a C++17 program that embeds CPython, animates a portrait with hyportrait.runtime.api.Animator and
// checks the result. Build with the Makefile next to this file; see README.md.
//
//   animate --models DIR --image IMG --video VID --out OUT [--backend onnxruntime] [--device cpu]
//           [--max-frames N] [--steps N] [--overlap N] [--segment N] [--stream 1]
//
// --stream 1: the streaming variant. Frames come from `Animator.stream` one by one as each segment is decoded
// (a C++ application would hand them to its display or encoder); here each crop's pixels are read through the
// buffer protocol and appended to OUT/stream.rgb (raw RGB24), with the latency of the first frame.
//
// Exit codes: 0 done and checked, 1 unexpected Python exception (traceback on stderr), 2 HyportraitError
// (`error [code]: message` on stderr), 3 the result failed a check, 64 bad command line.
//
// Which interpreter: $HYPORTRAIT_PYTHON if set, else the one the Makefile built against (compiled in as
// HYPORTRAIT_DEFAULT_PYTHON). It is given to CPython as `config.executable`, exactly as if that python had
// been started: a venv's python finds its pyvenv.cfg, so sys.prefix is the venv and its site-packages (where
// hyportrait is installed) are on sys.path. It must be the same Python version as the linked libpython.
//
// GIL: the thread that initialises the interpreter holds the GIL, and this program makes every Python call
// from that one thread, so it never releases or re-acquires it (torch and onnxruntime drop it inside their
// own kernels). An application with other threads would call PyEval_SaveThread() after initialising and wrap
// each call in PyGILState_Ensure()/PyGILState_Release().
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>

#ifndef HYPORTRAIT_DEFAULT_PYTHON
#define HYPORTRAIT_DEFAULT_PYTHON ""  // then $HYPORTRAIT_PYTHON must be set
#endif

namespace {

// Unique ownership of one strong reference; nullptr means "none".
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject* p) : p_(p) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  Ref(Ref&& other) noexcept : p_(other.p_) { other.p_ = nullptr; }
  Ref& operator=(Ref&& other) noexcept {
    std::swap(p_, other.p_);
    return *this;
  }
  ~Ref() { Py_XDECREF(p_); }
  PyObject* get() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  PyObject* p_ = nullptr;
};

// Thrown when a Python call failed; the Python exception stays set until main's handler fetches it (the Refs
// released while unwinding are plain decrefs, as on any C error path).
struct PythonError {};

Ref check(PyObject* p) {
  if (p == nullptr) throw PythonError{};
  return Ref(p);
}

std::string text(PyObject* o) {  // str(o) as UTF-8
  Ref s = check(PyObject_Str(o));
  const char* utf8 = PyUnicode_AsUTF8(s.get());
  if (utf8 == nullptr) throw PythonError{};
  return utf8;
}

Ref item(PyObject* mapping, const char* key) { return check(PyMapping_GetItemString(mapping, key)); }

long as_long(PyObject* o) {
  long v = PyLong_AsLong(o);
  if (v == -1 && PyErr_Occurred()) throw PythonError{};
  return v;
}

double as_double(PyObject* o) {
  double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) throw PythonError{};
  return v;
}

// One StreamFrame's crop through the buffer protocol: an (H, W, 3) uint8 array, copied out row-major.
struct Crop {
  long index = 0, height = 0, width = 0;
  double time = 0;
  std::string pixels;
};

Crop read_frame(PyObject* frame) {
  Crop c;
  c.index = as_long(check(PyObject_GetAttrString(frame, "index")).get());
  c.time = as_double(check(PyObject_GetAttrString(frame, "time")).get());
  Ref array = check(PyObject_GetAttrString(frame, "cropped"));
  Py_buffer view;
  // strided: the decoder's arrays are views in (frame, channel, row, column) order, copied out row-major here
  if (PyObject_GetBuffer(array.get(), &view, PyBUF_RECORDS_RO) < 0) throw PythonError{};
  bool rgb = view.ndim == 3 && view.shape[2] == 3 && view.itemsize == 1;
  if (rgb) {
    c.height = view.shape[0];
    c.width = view.shape[1];
    c.pixels.resize(static_cast<size_t>(view.len));
    if (PyBuffer_ToContiguous(c.pixels.data(), &view, view.len, 'C') < 0) {
      PyBuffer_Release(&view);
      throw PythonError{};
    }
  }
  PyBuffer_Release(&view);
  if (!rgb) {
    PyErr_SetString(PyExc_TypeError, "StreamFrame.cropped is not an (H, W, 3) uint8 array");
    throw PythonError{};
  }
  return c;
}

struct Options {
  std::map<std::string, std::string> values{{"backend", "onnxruntime"}, {"device", "cpu"}};
  const std::string& operator[](const char* name) const { return values.at(name); }
  bool has(const char* name) const { return values.count(name) != 0; }
};

struct Result {  // AnimateResult.as_dict() in C++ types
  std::string cropped, full_resolution;
  long num_frames = 0, missing_face_frames = 0;
  double fps = 0;
  std::map<std::string, double> timings;
};

Result read_result(PyObject* d) {
  Result r;
  r.cropped = text(item(d, "cropped").get());
  r.full_resolution = text(item(d, "full_resolution").get());
  r.num_frames = as_long(item(d, "num_frames").get());
  r.missing_face_frames = as_long(item(d, "missing_face_frames").get());
  r.fps = as_double(item(d, "fps").get());
  Ref timings = item(d, "timings");
  PyObject *key, *value;  // borrowed from the dict
  for (Py_ssize_t pos = 0; PyDict_Next(timings.get(), &pos, &key, &value);)
    r.timings[text(key)] = as_double(value);
  return r;
}

// A non-empty file, else a complaint on stderr.
bool check_output(const char* what, const std::string& path) {
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  if (!ec && size > 0) return true;
  std::cerr << "check failed: " << what << " " << path << (ec ? " does not exist" : " is empty") << "\n";
  return false;
}

using Clock = std::chrono::steady_clock;

// The streaming variant: iterate `animator.stream(image, read_frames(video))`, writing raw RGB crops.
int stream(PyObject* animator, const Options& opt) {
  Ref video = check(PyImport_ImportModule("hyportrait.runtime.video"));
  Ref frames = check(PyObject_CallMethod(video.get(), "read_frames", "s", opt["video"].c_str()));
  auto tic = Clock::now();
  Ref outputs = check(PyObject_CallMethod(animator, "stream", "sO", opt["image"].c_str(), frames.get()));
  std::filesystem::create_directories(opt["out"]);
  std::string path = opt["out"] + "/stream.rgb";
  std::ofstream raw(path, std::ios::binary);
  long count = 0, height = 0, width = 0;
  double first = 0, last_time = -1;
  bool ok = true;
  while (Ref frame = Ref(PyIter_Next(outputs.get()))) {  // a new reference per frame, nullptr at the end
    Crop c = read_frame(frame.get());
    if (count == 0) {
      first = std::chrono::duration<double>(Clock::now() - tic).count();
      height = c.height;
      width = c.width;
    }
    if (c.index != count || c.time < last_time || c.height != height || c.width != width) ok = false;
    last_time = c.time;
    raw.write(c.pixels.data(), static_cast<std::streamsize>(c.pixels.size()));
    ++count;
  }
  if (PyErr_Occurred()) throw PythonError{};  // the iterator ended with an exception
  raw.close();
  std::cout << "streamed: " << count << " frames of " << width << "x" << height << " to " << path
            << " (first after " << first << " s, last at t=" << last_time << " s)" << std::endl;
  if (!ok || count == 0 || !raw) {
    std::cerr << "check failed: frames out of order, of changing size, none, or not written\n";
    return 3;
  }
  return 0;
}

int animate(const Options& opt) {
  using clock = Clock;
  Ref api = check(PyImport_ImportModule("hyportrait.runtime.api"));
  Ref animator_type = check(PyObject_GetAttrString(api.get(), "Animator"));
  Ref args = check(Py_BuildValue("(s)", opt["models"].c_str()));
  Ref kwargs = check(Py_BuildValue("{s:s,s:s}", "backend", opt["backend"].c_str(), "device",
                                   opt["device"].c_str()));
  const std::pair<const char*, const char*> numbers[] = {
      {"max-frames", "max_frames"}, {"steps", "num_steps"}, {"overlap", "overlap"}, {"segment", "segment"}};
  for (auto [flag, keyword] : numbers) {
    if (!opt.has(flag)) continue;
    Ref number = check(PyLong_FromString(opt[flag].c_str(), nullptr, 10));
    if (PyDict_SetItemString(kwargs.get(), keyword, number.get()) < 0) throw PythonError{};
  }
  auto tic = clock::now();
  Ref animator = check(PyObject_Call(animator_type.get(), args.get(), kwargs.get()));  // load once...
  std::chrono::duration<double> load = clock::now() - tic;
  if (opt.has("stream") && opt["stream"] != "0") return stream(animator.get(), opt);
  Ref result = check(PyObject_CallMethod(animator.get(), "animate", "sss", opt["image"].c_str(),
                                         opt["video"].c_str(), opt["out"].c_str()));  // ...animate many times
  Ref as_dict = check(PyObject_CallMethod(result.get(), "as_dict", nullptr));
  Result r = read_result(as_dict.get());

  std::cout << "loaded " << opt["backend"] << " models in " << load.count() << " s\n"
            << "cropped: " << r.cropped << "\n"
            << "full_resolution: " << r.full_resolution << "\n"
            << "frames: " << r.num_frames << " at " << r.fps << " fps (" << r.missing_face_frames
            << " without a face)\n"
            << "timings:";
  for (const auto& [stage, seconds] : r.timings) std::cout << " " << stage << "=" << seconds << "s";
  std::cout << std::endl;

  bool ok = check_output("cropped", r.cropped) & check_output("full_resolution", r.full_resolution);
  if (r.num_frames <= 0) {
    std::cerr << "check failed: num_frames is " << r.num_frames << "\n";
    ok = false;
  }
  return ok ? 0 : 3;
}

Ref fetch_exception() {  // takes the current exception (an instance, traceback attached) or nullptr
#if PY_VERSION_HEX >= 0x030C0000
  return Ref(PyErr_GetRaisedException());
#else
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  if (value != nullptr && traceback != nullptr) PyException_SetTraceback(value, traceback);
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  return Ref(value);
#endif
}

// Is `exc` a hyportrait.errors.HyportraitError? (No, when hyportrait itself cannot be imported.)
bool is_hyportrait_error(PyObject* exc) {
  Ref errors(PyImport_ImportModule("hyportrait.errors"));
  Ref base(errors ? PyObject_GetAttrString(errors.get(), "HyportraitError") : nullptr);
  int is = base ? PyObject_IsInstance(exc, base.get()) : -1;
  PyErr_Clear();
  return is == 1;
}

// HyportraitError -> `error [code]: message`, exit 2; anything else -> its traceback, exit 1.
int report_python_error() {
  Ref exc = fetch_exception();
  if (!exc) {
    std::cerr << "error: a Python call failed without an exception\n";
    return 1;
  }
  try {
    if (is_hyportrait_error(exc.get())) {
      std::string code = text(check(PyObject_GetAttrString(exc.get(), "code")).get());
      std::string message = text(check(PyObject_GetAttrString(exc.get(), "message")).get());
      std::cerr << "error [" << code << "]: " << message << "\n";
      return 2;
    }
    Ref traceback = check(PyImport_ImportModule("traceback"));
    check(PyObject_CallMethod(traceback.get(), "print_exception", "O", exc.get()));  // the None is dropped
  } catch (const PythonError&) {  // could not even report it: the exception's type will do
    PyErr_Clear();
    std::cerr << "error: " << Py_TYPE(exc.get())->tp_name << "\n";
  }
  return 1;
}

void init_python(const char* argv0) {
  const char* env = std::getenv("HYPORTRAIT_PYTHON");
  const char* python = env != nullptr && *env != '\0' ? env : HYPORTRAIT_DEFAULT_PYTHON;
  if (std::error_code ec; !std::filesystem::exists(python, ec)) {
    std::cerr << "error: no Python interpreter " << python << " (set HYPORTRAIT_PYTHON)\n";
    std::exit(1);
  }
  PyConfig config;
  PyConfig_InitPythonConfig(&config);  // as `python` runs: PYTHON* variables, UTF-8 locale, signal handlers
  config.parse_argv = 0;               // our options are not Python's
  wchar_t* argv[] = {Py_DecodeLocale(argv0, nullptr)};
  PyStatus status = PyConfig_SetBytesString(&config, &config.executable, python);
  if (!PyStatus_Exception(status)) status = PyConfig_SetArgv(&config, 1, argv);
  if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
  PyMem_RawFree(argv[0]);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) Py_ExitStatusException(status);  // prints why and exits
}

int usage(const char* message) {
  std::cerr << message << "\nusage: animate --models DIR --image IMG --video VID --out OUT"
            << " [--backend onnxruntime] [--device cpu] [--max-frames N] [--steps N] [--overlap N]"
            << " [--segment N] [--stream 1]\n";
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  const std::string known = "|models|image|video|out|backend|device|max-frames|steps|overlap|segment|stream|";
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (flag.rfind("--", 0) != 0 || i + 1 >= argc) return usage(("bad or incomplete option " + flag).c_str());
    std::string name = flag.substr(2), value = argv[i + 1];
    if (known.find("|" + name + "|") == std::string::npos) return usage(("unknown option " + flag).c_str());
    bool number = name == "max-frames" || name == "steps" || name == "overlap" || name == "segment" ||
                  name == "stream";
    if (number && (value.empty() || value.find_first_not_of("0123456789") != std::string::npos))
      return usage((flag + " takes a whole number").c_str());
    opt.values[name] = value;
  }
  for (const char* required : {"models", "image", "video", "out"})
    if (!opt.has(required)) return usage((std::string("missing --") + required).c_str());

  init_python(argv[0]);
  int code;
  try {
    code = animate(opt);  // every Ref it made is released when it returns or throws
  } catch (const PythonError&) {
    code = report_python_error();
  }
  if (Py_FinalizeEx() < 0) code = code == 0 ? 120 : code;  // 120: flushing stdout failed, as python does
  return code;
}
