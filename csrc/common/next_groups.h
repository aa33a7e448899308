#pragma once
// The groups of GPU code behind IDD_OPS_CUDA_NEXT (cuda_next.h), each switched on by name, so that
// a GPU run can check some of them, and a switch-on take those that passed, when one group fails.
// The variable's value: "1" or "all" (every group), "0" or empty (none), or a comma list of the
// names below, read left to right, where "-name" takes a group off again ("all,-skd": all but
// SKD's). A name it does not know is an error, not a group left off. idd_ops/_switches.py reads it
// by the same rules; tests/test_cuda_next_groups.py holds the two to each other, and holds every
// group to code that reads it.
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <string>

namespace idd_ops {

// One bit each. The last three are read on the Python side alone (idd_ops/_switches.py): no
// kernel of theirs reads the switch.
enum class NextGroup : uint32_t {
  skd = 1u << 0,              // SKD: loads ahead, interleaved GEMM operands, its sum in one op
  idd_tail = 1u << 1,         // the IDD tail's forward in one launch
  class_sums = 1u << 2,       // the class sums' segments added by each tile's last block
  position = 1u << 3,         // the position loss's sum finished by its forward's last block
  cosine_backward = 1u << 4,  // the slot-map cosine backward's rows two a block
  ifvd = 1u << 5,             // IFVD's two maps and its loss in one op each
  class_means = 1u << 6,      // the class means in one op
  pixel_kd = 1u << 7,         // pixel KD's and CWD's sums in one op
};

struct NextGroupName {
  const char* name;
  NextGroup group;
};

// In bit order, as idd_ops/_switches.py's NEXT_GROUPS (a std::array: the list is empty while
// nothing is behind the switch).
constexpr std::array<NextGroupName, 8> kNextGroups{{
    {"skd", NextGroup::skd},
    {"idd_tail", NextGroup::idd_tail},
    {"class_sums", NextGroup::class_sums},
    {"position", NextGroup::position},
    {"cosine_backward", NextGroup::cosine_backward},
    {"ifvd", NextGroup::ifvd},
    {"class_means", NextGroup::class_means},
    {"pixel_kd", NextGroup::pixel_kd},
}};

// The groups `spec` (IDD_OPS_CUDA_NEXT's value; null: unset) switches on, one bit each.
inline uint32_t parse_next_groups(const char* spec) {
  uint32_t all = 0;
  std::string names;
  for (const auto& g : kNextGroups) {
    all |= static_cast<uint32_t>(g.group);
    names += names.empty() ? g.name : std::string(", ") + g.name;
  }
  uint32_t on = 0;
  const std::string text = spec == nullptr ? "" : spec;
  for (size_t start = 0; start <= text.size();) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string token = text.substr(start, end - start);
    start = end + 1;
    token.erase(0, token.find_first_not_of(" \t"));
    token.erase(token.find_last_not_of(" \t") + 1);
    if (token.empty()) continue;
    if (token == "1" || token == "all") {
      on = all;
      continue;
    }
    if (token == "0") {
      on = 0;
      continue;
    }
    const bool off = token[0] == '-';
    const std::string name = off ? token.substr(1) : token;
    uint32_t bit = 0;
    for (const auto& g : kNextGroups)
      if (name == g.name) bit = static_cast<uint32_t>(g.group);
    TORCH_CHECK(bit != 0, "IDD_OPS_CUDA_NEXT: unknown kernel group '", name, "' in '", text,
                "'; expected 1 or all (every group), 0 (none), or a comma list of ",
                names.empty() ? std::string("(no groups at present)") : names, ", a '-' before a name taking it off");
    on = off ? on & ~bit : on | bit;
  }
  return on;
}

}  // namespace idd_ops
