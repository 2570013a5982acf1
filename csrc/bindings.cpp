// Python module megasail._C: numpy in, numpy out, no torch. The GIL is released around every
// loop and every write, so preprocessing threads and the training loader are not held up.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <utility>
#include <vector>

#include "crc32.h"
#include "index_helpers.h"
#include "shard_format.h"
#include "shard_writer.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A contiguous read-only view of a bytes-like object; released (with the GIL held) on destruction.
class ByteView {
 public:
  explicit ByteView(const py::handle& object) {
    if (PyObject_GetBuffer(object.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~ByteView() { PyBuffer_Release(&view_); }
  ByteView(const ByteView&) = delete;
  ByteView& operator=(const ByteView&) = delete;
  megasail::ImageBytes bytes() const {
    return {static_cast<const uint8_t*>(view_.buf), static_cast<size_t>(view_.len)};
  }

 private:
  Py_buffer view_{};
};

// Hand a std::vector's memory to numpy without copying it.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owned->size()), owned->data(), owner);
}

void add_sample(megasail::ShardWriter& writer, const CArray<int32_t>& tokens, const CArray<int32_t>& segment_lengths,
                const CArray<int8_t>& segment_modes, const py::sequence& images, const CArray<uint32_t>& widths,
                const CArray<uint32_t>& heights, const CArray<uint8_t>& formats, uint32_t source_id) {
  if (tokens.ndim() != 1 || segment_lengths.ndim() != 1 || segment_modes.ndim() != 1 || widths.ndim() != 1 ||
      heights.ndim() != 1 || formats.ndim() != 1)
    throw py::value_error("add_sample takes one-dimensional arrays");
  if (segment_lengths.size() != segment_modes.size())
    throw py::value_error("segment_lengths and segment_modes differ in length");
  if (widths.size() != heights.size() || widths.size() != formats.size())
    throw py::value_error("widths, heights and formats differ in length");
  std::vector<std::unique_ptr<ByteView>> views;  // destroyed after the GIL is taken back
  views.reserve(images.size());
  megasail::SampleView sample{tokens.data(), static_cast<size_t>(tokens.size()),
                              segment_lengths.data(), segment_modes.data(), static_cast<size_t>(segment_lengths.size()),
                              {}, widths.data(), heights.data(), formats.data(), static_cast<size_t>(widths.size()),
                              source_id};
  for (const py::handle image : images) {
    views.push_back(std::make_unique<ByteView>(image));
    sample.images.push_back(views.back()->bytes());
  }
  py::gil_scoped_release release;
  writer.add_sample(sample);
}

py::array_t<int64_t> shuffle_indices(int64_t n, uint64_t seed) {
  if (n < 0) throw py::value_error("n must be >= 0");
  py::array_t<int64_t> out(n);
  int64_t* data = out.mutable_data();
  py::gil_scoped_release release;
  megasail::shuffle_indices(n, seed, data);
  return out;
}

py::array_t<int64_t> permute_indices(const CArray<int64_t>& positions, int64_t n, uint64_t seed, int rounds) {
  if (positions.ndim() != 1) throw py::value_error("positions must be one-dimensional");
  py::array_t<int64_t> out(positions.size());
  int64_t* data = out.mutable_data();
  const int64_t* in = positions.data();
  const int64_t m = positions.size();
  py::gil_scoped_release release;
  megasail::permute_indices(in, m, n, seed, rounds, data);
  return out;
}

py::tuple pack_samples(const CArray<int64_t>& lengths, int64_t seq_length, uint64_t seed, int64_t window) {
  if (lengths.ndim() != 1) throw py::value_error("lengths must be one-dimensional");
  megasail::Packing packing;
  {
    py::gil_scoped_release release;
    packing = megasail::pack_samples(lengths.data(), lengths.size(), seq_length, seed, window);
  }
  return py::make_tuple(to_numpy(std::move(packing.pack_offsets)), to_numpy(std::move(packing.order)));
}

py::tuple blend_indices(const CArray<double>& weights, int64_t num_samples, const CArray<int64_t>& sizes) {
  if (weights.ndim() != 1 || sizes.ndim() != 1 || weights.size() != sizes.size())
    throw py::value_error("weights and sizes must be one-dimensional and of equal length");
  if (num_samples < 0) throw py::value_error("num_samples must be >= 0");
  py::array_t<int32_t> dataset_index(num_samples);
  py::array_t<int64_t> dataset_sample_index(num_samples);
  int32_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    megasail::blend_indices(weights.data(), sizes.data(), weights.size(), num_samples, di, dsi);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

uint32_t crc32(const py::handle& data, uint32_t crc) {
  ByteView view(data);
  const megasail::ImageBytes bytes = view.bytes();
  py::gil_scoped_release release;
  return megasail::crc32(bytes.data, bytes.size, crc);
}

uint64_t merge_shards(const std::vector<std::string>& shard_prefixes, const std::string& out_prefix) {
  py::gil_scoped_release release;
  return megasail::merge_shards(shard_prefixes, out_prefix);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megasail native dataset layer: shard writer, shard merge, shuffle/pack/blend index helpers";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const megasail::IoError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<megasail::ShardWriter>(m, "ShardWriter",
                                    "Appends samples to PREFIX.{bin,idx,img.bin,img.idx} via .tmp files.")
      .def(py::init<std::string, bool>(), "prefix"_a, "sync"_a = true,
           "sync=False skips the fsyncs at finalize (for temporary shards a merge fsyncs later).")
      .def("add_sample", &add_sample, "tokens"_a, "segment_lengths"_a, "segment_modes"_a, "images"_a, "widths"_a,
           "heights"_a, "formats"_a, "source_id"_a,
           "Append one sample; validates it fully first (ValueError leaves the writer unchanged).")
      .def("finalize", &megasail::ShardWriter::finalize, py::call_guard<py::gil_scoped_release>(),
           "Flush, fsync (unless sync=False), write both indexes and rename the .tmp files to their final names.")
      .def("abort", &megasail::ShardWriter::abort, "Remove the .tmp files; no-op once finalized.")
      .def_property_readonly("prefix", &megasail::ShardWriter::prefix)
      .def_property_readonly("num_samples", &megasail::ShardWriter::num_samples)
      .def_property_readonly("num_segments", &megasail::ShardWriter::num_segments)
      .def_property_readonly("num_tokens", &megasail::ShardWriter::num_tokens)
      .def_property_readonly("num_images", &megasail::ShardWriter::num_images)
      .def_property_readonly("image_bytes", &megasail::ShardWriter::image_bytes)
      .def_property_readonly("sync", &megasail::ShardWriter::sync)
      .def_property_readonly("is_open", &megasail::ShardWriter::is_open);

  py::class_<megasail::ShardMerger>(m, "ShardMerger",
                                    "Concatenates finished shards, appended in order, into PREFIX via .tmp files.")
      .def(py::init<std::string>(), "out_prefix"_a)
      .def("append", py::overload_cast<const std::string&>(&megasail::ShardMerger::append), "shard_prefix"_a,
           py::call_guard<py::gil_scoped_release>(), "Copy the next finished shard's data after what is there.")
      .def("finalize", &megasail::ShardMerger::finalize, py::call_guard<py::gil_scoped_release>(),
           "fsync, write both indexes, rename the .tmp files; returns the sample count.")
      .def("abort", &megasail::ShardMerger::abort, py::call_guard<py::gil_scoped_release>(),
           "Remove the .tmp files; no-op once finalized.")
      .def_property_readonly("prefix", &megasail::ShardMerger::prefix)
      .def_property_readonly("num_shards", &megasail::ShardMerger::num_shards)
      .def_property_readonly("num_samples", &megasail::ShardMerger::num_samples)
      .def_property_readonly("is_open", &megasail::ShardMerger::is_open);

  m.def("merge_shards", &merge_shards, "shard_prefixes"_a, "out_prefix"_a,
        "Concatenate finished shards in order into out_prefix; returns the sample count.");
  m.def("crc32", &crc32, "data"_a, "crc"_a = 0,
        "CRC-32 of a bytes-like object, continuing from crc; equals zlib.crc32(data, crc).");
  m.def("shuffle_indices", &shuffle_indices, "n"_a, "seed"_a, "Seeded Fisher-Yates permutation of 0..n-1 (int64).");
  m.def("permute_indices", &permute_indices, "positions"_a, "n"_a, "seed"_a, "rounds"_a,
        "Values at int64 positions of the seeded Feistel permutation of 0..n-1 (O(1) memory).");
  m.def("pack_samples", &pack_samples, "lengths"_a, "seq_length"_a, "seed"_a, "window"_a,
        "Windowed best-fit-decreasing packing -> (pack_offsets int64[P+1], order int64[N]).");
  m.def("blend_indices", &blend_indices, "weights"_a, "num_samples"_a, "sizes"_a,
        "Greedy weighted interleaving -> (dataset_index int32[n], dataset_sample_index int64[n]).");
}
