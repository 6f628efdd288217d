"""EasyEdit's examples/run_zsre_llama2.py, run on lmedit: the import is the only lmedit-specific line.

    python docs/examples/run_zsre_easyedit_style.py --editing_method ROME \
        --hparams_dir docs/examples/easyedit-hparams/ROME.yaml \
        --data_dir ../shared/data/zsre --ds_size 20 --metrics_save_dir /tmp/out

Differences from EasyEdit's script, none of them in the calls: ``--ds_size`` takes the first
records instead of a random sample (so runs can be compared); the methods EasyEdit's script
leaves out (FT-M through FT, GRACE, DEFER, WISE) are listed too; IKE's demonstrations come from
``--train_data_path`` (default: EasyEdit's ``zsre_mend_train_10000.json`` in ``--data_dir``;
a CounterFact training file is read with ``CounterFactDataset``), and the sentence model is
not loaded here because lmedit's IKE loads it itself.
"""
import os.path
import sys
sys.path.append('..')
import json
import argparse

from lmedit.compat.easyedit import (  # EasyEdit: from easyeditor import (...)
    FTHyperParams, IKEHyperParams, MEMITHyperParams, ROMEHyperParams, LoRAHyperParams, GraceHyperParams,
    DeferHyperParams, WISEHyperParams, BaseEditor, ZsreDataset, CounterFactDataset,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument('--editing_method', required=True, type=str)
    parser.add_argument('--hparams_dir', required=True, type=str)
    parser.add_argument('--data_dir', required=True, type=str)
    parser.add_argument('--ds_size', default=None, type=int)
    parser.add_argument('--metrics_save_dir', default='./output', type=str)
    parser.add_argument('--train_data_path', default=None, type=str)

    args = parser.parse_args()

    if args.editing_method in ('FT', 'FT-L', 'FT-M'):
        editing_hparams = FTHyperParams
    elif args.editing_method == 'IKE':
        editing_hparams = IKEHyperParams
    elif args.editing_method == 'MEMIT':
        editing_hparams = MEMITHyperParams
    elif args.editing_method == 'ROME':
        editing_hparams = ROMEHyperParams
    elif args.editing_method == 'LoRA':
        editing_hparams = LoRAHyperParams
    elif args.editing_method == 'GRACE':
        editing_hparams = GraceHyperParams
    elif args.editing_method == 'DEFER':
        editing_hparams = DeferHyperParams
    elif args.editing_method == 'WISE':
        editing_hparams = WISEHyperParams
    else:
        raise NotImplementedError

    test_data = json.load(open(os.path.join(args.data_dir, 'zsre_mend_eval_portability_gpt4.json'), 'r', encoding='utf-8'))

    if args.ds_size is not None:
        test_data = test_data[:args.ds_size]

    prompts = [test_data_['src'] for test_data_ in test_data]
    rephrase_prompts = [edit_data_['rephrase'] for edit_data_ in test_data]
    target_new = [edit_data_['alt'] for edit_data_ in test_data]
    locality_prompts = [edit_data_['loc'] for edit_data_ in test_data]
    locality_ans = [edit_data_['loc_ans'] for edit_data_ in test_data]
    portability_prompts = [edit_data_['portability']['New Question'] for edit_data_ in test_data]
    portability_ans = [edit_data_['portability']['New Answer'] for edit_data_ in test_data]

    locality_inputs = {
        'neighborhood': {
            'prompt': locality_prompts,
            'ground_truth': locality_ans
        },
    }
    portability_inputs = {
        'one_hop': {
            'prompt': portability_prompts,
            'ground_truth': portability_ans
        },
    }
    subject = [edit_data_['subject'] for edit_data_ in test_data]
    hparams = editing_hparams.from_hparams(args.hparams_dir)

    if args.editing_method == 'IKE':
        train_data_path = args.train_data_path or os.path.join(args.data_dir, 'zsre_mend_train_10000.json')
        dataset_class = CounterFactDataset if 'counterfact' in os.path.basename(train_data_path) else ZsreDataset
        train_ds = dataset_class(train_data_path)
    else:
        train_ds = None

    editor = BaseEditor.from_hparams(hparams)
    metrics, edited_model, _ = editor.edit(
        prompts=prompts,
        rephrase_prompts=rephrase_prompts,
        target_new=target_new,
        subject=subject,
        train_ds=train_ds,
        locality_inputs=locality_inputs,
        portability_inputs=portability_inputs,
        keep_original_weight=True
    )

    os.makedirs(args.metrics_save_dir, exist_ok=True)
    json.dump(metrics, open(os.path.join(args.metrics_save_dir, f'{args.editing_method}_results.json'), 'w'), indent=4)
