//! A check of the eBPF object before it is embedded (build.rs) that catches the way a
//! wrongly built object fails in the kernel: every function must end in an exit or a jump,
//! or the verifier refuses the program with "last insn is not an exit or jmp". A debug
//! build of the eBPF side once made exactly that (core's panic paths as subprograms ending
//! in a call), and it only showed when the agent started on a node.
//!
//! Shared by build.rs (`#[path]`) and the unit tests; it uses nothing of the crate.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

/// `BPF_JMP | BPF_EXIT`, `BPF_JMP | BPF_JA`, `BPF_JMP32 | BPF_JA`: what the verifier
/// accepts as a function's last instruction.
const LAST_OPCODES: [u8; 3] = [0x95, 0x05, 0x06];
const INSN_SIZE: u64 = 8;

/// The functions of `elf` whose last instruction the kernel refuses, with their opcodes.
pub fn functions_without_exit(elf: &[u8]) -> Result<Vec<(String, u8)>, String> {
    let file = object::File::parse(elf).map_err(|e| format!("not an ELF object: {e}"))?;
    let mut bad = Vec::new();
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(index) = sym.section_index() else { continue };
        let section = file.section_by_index(index).map_err(|e| e.to_string())?;
        let data = section.data().map_err(|e| e.to_string())?;
        let name = sym.name().unwrap_or("?").to_string();
        // Symbol values of a relocatable object are offsets into their section.
        let last = sym.address() + sym.size() - INSN_SIZE;
        let opcode = usize::try_from(last)
            .ok()
            .and_then(|i| data.get(i))
            .copied()
            .ok_or_else(|| format!("{name} lies outside its section"))?;
        if !LAST_OPCODES.contains(&opcode) {
            bad.push((name, opcode));
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;
    use crate::datapath::EBPF_OBJECT;

    #[test]
    fn the_embedded_object_passes() {
        assert_eq!(functions_without_exit(EBPF_OBJECT).unwrap(), []);
    }

    /// The debug build's failure, made from the real object: the last instruction of
    /// `meshnet_from_pod` turned into a call.
    #[test]
    fn a_program_ending_in_a_call_is_caught() {
        let file = object::File::parse(EBPF_OBJECT).unwrap();
        let sym = file.symbols().find(|s| s.name() == Ok("meshnet_from_pod")).unwrap();
        let section = file.section_by_index(sym.section_index().unwrap()).unwrap();
        let (offset, _) = section.file_range().unwrap();
        let at = usize::try_from(offset + sym.address() + sym.size() - INSN_SIZE).unwrap();
        let mut broken = EBPF_OBJECT.to_vec();
        assert!(LAST_OPCODES.contains(&broken[at]), "meshnet_from_pod ends in {:#04x}", broken[at]);
        broken[at] = 0x85; // BPF_JMP | BPF_CALL
        assert_eq!(functions_without_exit(&broken).unwrap(), [("meshnet_from_pod".to_string(), 0x85)]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(functions_without_exit(b"not an elf").is_err());
    }
}
