#pragma once
/// \file
/// lockstep-bench's report: the terminal tables and the markdown (README) tables, rendered
/// from the JSON document alone, so that --from-json renders an old run the same way.

#include <nlohmann/json.hpp>
#include <string>

namespace lockstep {
namespace bench {

/// The report of `doc` (what run_benchmark returns, or an older --json file): with
/// `markdown`, a paragraph naming the command, machine and method, then markdown tables;
/// else aligned plain-text tables. Sections: the headline (lockstep DDP against the
/// synchronized floor and PyTorch's DDP, when either ran), one table per model, the targets,
/// the all-reduce sweep.
std::string render_report(const nlohmann::json& doc, bool markdown);

}  // namespace bench
}  // namespace lockstep
